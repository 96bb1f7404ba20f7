"""The read models: balances, transaction history and daily totals, each kept by the projection runner."""
