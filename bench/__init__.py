"""End-to-end benchmark of splitdet against the monolithic detector and the paper's model."""
