"""Reading JSONL conversations and turning them into token ids with loss masks."""
