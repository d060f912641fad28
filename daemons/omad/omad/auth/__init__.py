"""Who is calling: users with passwords, API tokens for machines, sessions, and failed-login limits."""
