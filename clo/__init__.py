"""CLO trainer: data, translation, training, evaluation, CLI."""
