"""BGP: the pure announce policy and command rendering, the controller that keeps announcements equal to
it, and the ExaBGP process with its API channel."""
