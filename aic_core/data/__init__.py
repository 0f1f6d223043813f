"""The data stage: inputs (`inputs`: files, folders, globs; text, JSONL, Parquet), the streaming encoder (`encode`)
and the token cache with its batches (`tokens`). Nothing is imported here: the encoder's worker processes import
`encode` without torch."""
