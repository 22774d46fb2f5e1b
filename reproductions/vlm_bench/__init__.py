"""The VLM leaderboard: every VLM method of the registry at identical budgets on the trained test-bed VLM."""
