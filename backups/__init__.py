"""Backup pipeline (dump, encrypt, store, restore, verify): see the backups issue."""
