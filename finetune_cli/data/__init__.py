"""Reading data from its sources into records of one shape, and turning them into token ids with loss masks."""
