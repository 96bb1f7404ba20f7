# The hub and the projection worker: one image, two commands (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY hub hub
COPY projections projections
RUN pip install --no-cache-dir . && useradd --create-home giftcard
USER giftcard
EXPOSE 8080
CMD ["giftcard", "serve", "--host", "0.0.0.0", "--port", "8080"]
