"""The spec's data: the typed IR (frozen dataclasses), its errors and size limits. Imports nothing of maskdsl."""
