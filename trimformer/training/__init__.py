"""[torch] Training: fine-tuning, distillation, QAT, Fisher scores and block reconstruction."""
