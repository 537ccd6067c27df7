"""Property-based fuzzing of the rule engine and the rules: random models, compiled, checked."""
