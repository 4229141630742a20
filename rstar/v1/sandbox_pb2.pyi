from rstar.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    OK: _ClassVar[FailureKind]
    ERROR: _ClassVar[FailureKind]
    TIMEOUT: _ClassVar[FailureKind]
    MEMORY: _ClassVar[FailureKind]
    KILLED: _ClassVar[FailureKind]
    OUTPUT_LIMIT: _ClassVar[FailureKind]
FAILURE_KIND_UNSPECIFIED: FailureKind
OK: FailureKind
ERROR: FailureKind
TIMEOUT: FailureKind
MEMORY: FailureKind
KILLED: FailureKind
OUTPUT_LIMIT: FailureKind

class Limits(_message.Message):
    __slots__ = ("wall_seconds", "memory_bytes", "output_bytes")
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    wall_seconds: float
    memory_bytes: int
    output_bytes: int
    def __init__(self, wall_seconds: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class Program(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("programs", "limits")
    PROGRAMS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    programs: _containers.RepeatedCompositeFieldContainer[Program]
    limits: Limits
    def __init__(self, programs: _Optional[_Iterable[_Union[Program, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ExecutionResult(_message.Message):
    __slots__ = ("stdout", "stderr", "exit_code", "failure", "duration_seconds", "truncated")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    stdout: str
    stderr: str
    exit_code: int
    failure: FailureKind
    duration_seconds: float
    truncated: bool
    def __init__(self, stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., exit_code: _Optional[int] = ..., failure: _Optional[_Union[FailureKind, str]] = ..., duration_seconds: _Optional[float] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExecutionResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ExecutionResult, _Mapping]]] = ...) -> None: ...
