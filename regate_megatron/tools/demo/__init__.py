"""The digits-VQA demo: a small, real image task for ReGATE runs on one machine."""
