"""omad: the OMA's API daemon (unprivileged): /api/v1, the database, the jobs, and the clients of the agents."""
