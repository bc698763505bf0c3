from replicator._early import run

run()
