"""`acb-run`: run a program under the node's assigner (`gate`: process-level; `auto`: PyTorch)."""
