"""Which target tokens matter: the keep-ratio schedule, the scores, the student-loss EMA,
the reference-loss store and the frozen text-only teacher (offline and online)."""
