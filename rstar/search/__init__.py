"""The search domain: MCTS on one tree (`mcts`), the batched engine over many trees
(`engine`), answer selection (`selection`) and the search core that turns requests
into trees and results (`core`). Pure: no gRPC, no model, no storage backend."""
