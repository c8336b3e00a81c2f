"""The language's front: text -> positioned syntax -> validated IR (`parse`, `load`). Validation asks the
analysis whether a mask is analysable, so this floor sits above it."""
