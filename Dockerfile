# The hub, the projection worker and the one-shot migrations: one image, three commands (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
# Dependencies first, exactly as locked (every version and hash: requirements.lock, made by the command
# at its top): a rebuild installs what was tested, and this layer is reused until the lock changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY hub hub
COPY projections projections
# --no-deps: nothing beyond the lock; bench/ stays out (.dockerignore), so does `giftcard bench`.
RUN pip install --no-cache-dir --no-deps . && useradd --create-home giftcard
USER giftcard
EXPOSE 8080
CMD ["giftcard", "serve", "--host", "0.0.0.0", "--port", "8080"]
