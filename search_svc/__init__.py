"""SearchService: the rStar-Math MCTS engine (pure core in `mcts`/`engine`), its gRPC servicer and the trajectory store."""
