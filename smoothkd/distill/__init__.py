"""Stage two: a lean trainer that streams sparse soft labels from a store (no live teacher)."""
