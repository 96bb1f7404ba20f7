"""The auditors: a card's history replayed, the whole ledger verified, read models compared with a replay."""
