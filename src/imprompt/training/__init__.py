"""Training IP-Adapters: the paper's recipe (section 3.3), cached features, resumable, with accelerate."""
