"""One router per concern: prediction, model and health, monitoring, feedback, admin."""
