"""[torch] Distillation: losses, feature capture, students, the trainer and DDP launch."""
