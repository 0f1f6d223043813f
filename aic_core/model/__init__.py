"""The model: the transformer's building blocks (`nn`), the one opener of every model source (`loading`) and the
format maps to Hugging Face and PEFT (`convert`)."""
