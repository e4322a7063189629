"""Fine-tuning what the freeze rewrite left trainable: ``finetune`` and distillation."""
