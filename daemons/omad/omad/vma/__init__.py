"""VMA enrollment: pairing codes, proof of possession of the VMA key, approval, and its SSH tunnel account."""
