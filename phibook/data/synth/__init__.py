"""Synthetic textbook data: topics, prompts, teachers and resumable generation jobs."""
