from rstar.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SelectionStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_STRATEGY_UNSPECIFIED: _ClassVar[SelectionStrategy]
    TOP_PPM: _ClassVar[SelectionStrategy]
    MAJORITY_VOTE: _ClassVar[SelectionStrategy]
    PPM_WEIGHTED_VOTE: _ClassVar[SelectionStrategy]

class AnnotationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANNOTATION_MODE_UNSPECIFIED: _ClassVar[AnnotationMode]
    TERMINAL_GUIDED: _ClassVar[AnnotationMode]
    PPM_AUGMENTED: _ClassVar[AnnotationMode]
SELECTION_STRATEGY_UNSPECIFIED: SelectionStrategy
TOP_PPM: SelectionStrategy
MAJORITY_VOTE: SelectionStrategy
PPM_WEIGHTED_VOTE: SelectionStrategy
ANNOTATION_MODE_UNSPECIFIED: AnnotationMode
TERMINAL_GUIDED: AnnotationMode
PPM_AUGMENTED: AnnotationMode

class Budget(_message.Message):
    __slots__ = ("rollouts", "candidates_per_expansion", "max_depth", "max_tokens", "max_wall_seconds", "trajectories")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_PER_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    rollouts: int
    candidates_per_expansion: int
    max_depth: int
    max_tokens: int
    max_wall_seconds: float
    trajectories: int
    def __init__(self, rollouts: _Optional[int] = ..., candidates_per_expansion: _Optional[int] = ..., max_depth: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_wall_seconds: _Optional[float] = ..., trajectories: _Optional[int] = ...) -> None: ...

class SolveRequest(_message.Message):
    __slots__ = ("problem", "budget", "seed", "strategy", "exploration", "temperature")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    problem: str
    budget: Budget
    seed: int
    strategy: SelectionStrategy
    exploration: float
    temperature: float
    def __init__(self, problem: _Optional[str] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., seed: _Optional[int] = ..., strategy: _Optional[_Union[SelectionStrategy, str]] = ..., exploration: _Optional[float] = ..., temperature: _Optional[float] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("index", "text", "code", "output", "q", "visits", "ppm_score", "terminal", "failure")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    VISITS_FIELD_NUMBER: _ClassVar[int]
    PPM_SCORE_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    code: str
    output: str
    q: float
    visits: int
    ppm_score: float
    terminal: bool
    failure: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., code: _Optional[str] = ..., output: _Optional[str] = ..., q: _Optional[float] = ..., visits: _Optional[int] = ..., ppm_score: _Optional[float] = ..., terminal: _Optional[bool] = ..., failure: _Optional[str] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("steps", "answer", "final_score", "mean_q", "seed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    FINAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_Q_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    answer: str
    final_score: float
    mean_q: float
    seed: int
    def __init__(self, steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., answer: _Optional[str] = ..., final_score: _Optional[float] = ..., mean_q: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Alternative(_message.Message):
    __slots__ = ("answer", "votes", "best_score", "weighted_score")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    answer: str
    votes: int
    best_score: float
    weighted_score: float
    def __init__(self, answer: _Optional[str] = ..., votes: _Optional[int] = ..., best_score: _Optional[float] = ..., weighted_score: _Optional[float] = ...) -> None: ...

class StageTimes(_message.Message):
    __slots__ = ("generate_seconds", "ppm_seconds", "sandbox_seconds", "other_seconds", "total_seconds")
    GENERATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PPM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OTHER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    generate_seconds: float
    ppm_seconds: float
    sandbox_seconds: float
    other_seconds: float
    total_seconds: float
    def __init__(self, generate_seconds: _Optional[float] = ..., ppm_seconds: _Optional[float] = ..., sandbox_seconds: _Optional[float] = ..., other_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class SearchStats(_message.Message):
    __slots__ = ("rollouts", "nodes", "generated_tokens", "prompt_tokens", "executions", "policy_calls", "ppm_calls", "sandbox_calls", "times", "trees", "stop_reason")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_CALLS_FIELD_NUMBER: _ClassVar[int]
    PPM_CALLS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_CALLS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    TREES_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    rollouts: int
    nodes: int
    generated_tokens: int
    prompt_tokens: int
    executions: int
    policy_calls: int
    ppm_calls: int
    sandbox_calls: int
    times: StageTimes
    trees: int
    stop_reason: str
    def __init__(self, rollouts: _Optional[int] = ..., nodes: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., executions: _Optional[int] = ..., policy_calls: _Optional[int] = ..., ppm_calls: _Optional[int] = ..., sandbox_calls: _Optional[int] = ..., times: _Optional[_Union[StageTimes, _Mapping]] = ..., trees: _Optional[int] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class SolveResponse(_message.Message):
    __slots__ = ("answer", "trajectory", "alternatives", "trajectories", "stats", "model_versions", "strategy", "trajectories_total", "alternatives_total")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    answer: str
    trajectory: Trajectory
    alternatives: _containers.RepeatedCompositeFieldContainer[Alternative]
    trajectories: _containers.RepeatedCompositeFieldContainer[Trajectory]
    stats: SearchStats
    model_versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelVersion]
    strategy: str
    trajectories_total: int
    alternatives_total: int
    def __init__(self, answer: _Optional[str] = ..., trajectory: _Optional[_Union[Trajectory, _Mapping]] = ..., alternatives: _Optional[_Iterable[_Union[Alternative, _Mapping]]] = ..., trajectories: _Optional[_Iterable[_Union[Trajectory, _Mapping]]] = ..., stats: _Optional[_Union[SearchStats, _Mapping]] = ..., model_versions: _Optional[_Iterable[_Union[_common_pb2.ModelVersion, _Mapping]]] = ..., strategy: _Optional[str] = ..., trajectories_total: _Optional[int] = ..., alternatives_total: _Optional[int] = ...) -> None: ...

class SolveProgress(_message.Message):
    __slots__ = ("rollouts_done", "rollouts_total", "best_answer", "best_score", "generated_tokens", "executions", "elapsed_seconds")
    ROLLOUTS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BEST_ANSWER_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rollouts_done: int
    rollouts_total: int
    best_answer: str
    best_score: float
    generated_tokens: int
    executions: int
    elapsed_seconds: float
    def __init__(self, rollouts_done: _Optional[int] = ..., rollouts_total: _Optional[int] = ..., best_answer: _Optional[str] = ..., best_score: _Optional[float] = ..., generated_tokens: _Optional[int] = ..., executions: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class SolveEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: SolveProgress
    result: SolveResponse
    def __init__(self, progress: _Optional[_Union[SolveProgress, _Mapping]] = ..., result: _Optional[_Union[SolveResponse, _Mapping]] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("id", "problem", "answer")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    id: str
    problem: str
    answer: str
    def __init__(self, id: _Optional[str] = ..., problem: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("problems", "budget", "annotation", "seed", "round", "shard", "store", "return_trees", "exploration", "temperature")
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    RETURN_TREES_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    problems: _containers.RepeatedCompositeFieldContainer[Problem]
    budget: Budget
    annotation: AnnotationMode
    seed: int
    round: int
    shard: str
    store: bool
    return_trees: bool
    exploration: float
    temperature: float
    def __init__(self, problems: _Optional[_Iterable[_Union[Problem, _Mapping]]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., annotation: _Optional[_Union[AnnotationMode, str]] = ..., seed: _Optional[int] = ..., round: _Optional[int] = ..., shard: _Optional[str] = ..., store: _Optional[bool] = ..., return_trees: _Optional[bool] = ..., exploration: _Optional[float] = ..., temperature: _Optional[float] = ...) -> None: ...

class SynthesisProgress(_message.Message):
    __slots__ = ("problems_done", "problems_total", "solved", "rollouts_done", "generated_tokens", "elapsed_seconds")
    PROBLEMS_DONE_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_DONE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    problems_done: int
    problems_total: int
    solved: int
    rollouts_done: int
    generated_tokens: int
    elapsed_seconds: float
    def __init__(self, problems_done: _Optional[int] = ..., problems_total: _Optional[int] = ..., solved: _Optional[int] = ..., rollouts_done: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class TreeResult(_message.Message):
    __slots__ = ("problem_id", "solved", "nodes", "tree_json")
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TREE_JSON_FIELD_NUMBER: _ClassVar[int]
    problem_id: str
    solved: bool
    nodes: int
    tree_json: str
    def __init__(self, problem_id: _Optional[str] = ..., solved: _Optional[bool] = ..., nodes: _Optional[int] = ..., tree_json: _Optional[str] = ...) -> None: ...

class SynthesisDone(_message.Message):
    __slots__ = ("shard_key", "problems", "solved", "stats", "model_versions")
    SHARD_KEY_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    shard_key: str
    problems: int
    solved: int
    stats: SearchStats
    model_versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelVersion]
    def __init__(self, shard_key: _Optional[str] = ..., problems: _Optional[int] = ..., solved: _Optional[int] = ..., stats: _Optional[_Union[SearchStats, _Mapping]] = ..., model_versions: _Optional[_Iterable[_Union[_common_pb2.ModelVersion, _Mapping]]] = ...) -> None: ...

class SynthesizeEvent(_message.Message):
    __slots__ = ("progress", "tree", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: SynthesisProgress
    tree: TreeResult
    done: SynthesisDone
    def __init__(self, progress: _Optional[_Union[SynthesisProgress, _Mapping]] = ..., tree: _Optional[_Union[TreeResult, _Mapping]] = ..., done: _Optional[_Union[SynthesisDone, _Mapping]] = ...) -> None: ...
