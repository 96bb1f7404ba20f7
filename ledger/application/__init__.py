"""The application services: each command loads a card, lets the domain decide and appends what it decided."""
