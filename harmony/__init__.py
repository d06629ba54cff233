"""The GPT-OSS adapter: harmony rendering and parsing (`harmony.render`), the o200k vocabulary
(`harmony.vocab`), 4-bit GPT-OSS loading for LoRA training (`harmony.gpt_oss`) and the memory
planner (`python harmony/plan.py`)."""
