"""Turns SchedulerOutput into tensors, runs the model and samples; never schedules or frees blocks."""
