from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATE_UNSPECIFIED: _ClassVar[DeviceState]
    ONLINE: _ClassVar[DeviceState]
    OFFLINE: _ClassVar[DeviceState]
    MAINTENANCE: _ClassVar[DeviceState]
    ERROR: _ClassVar[DeviceState]

class CommandState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_STATE_UNSPECIFIED: _ClassVar[CommandState]
    ACCEPTED: _ClassVar[CommandState]
    STARTED: _ClassVar[CommandState]
    COMPLETED: _ClassVar[CommandState]
    FAILED: _ClassVar[CommandState]
    REJECTED: _ClassVar[CommandState]
DEVICE_STATE_UNSPECIFIED: DeviceState
ONLINE: DeviceState
OFFLINE: DeviceState
MAINTENANCE: DeviceState
ERROR: DeviceState
COMMAND_STATE_UNSPECIFIED: CommandState
ACCEPTED: CommandState
STARTED: CommandState
COMPLETED: CommandState
FAILED: CommandState
REJECTED: CommandState

class MeasurementSpec(_message.Message):
    __slots__ = ("metric", "unit", "min", "max", "expected_interval_s")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    metric: str
    unit: str
    min: float
    max: float
    expected_interval_s: float
    def __init__(self, metric: _Optional[str] = ..., unit: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., expected_interval_s: _Optional[float] = ...) -> None: ...

class RegisterDeviceRequest(_message.Message):
    __slots__ = ("device_id", "device_type", "model", "location", "specs", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SPECS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_type: str
    model: str
    location: str
    specs: _containers.RepeatedCompositeFieldContainer[MeasurementSpec]
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, device_id: _Optional[str] = ..., device_type: _Optional[str] = ..., model: _Optional[str] = ..., location: _Optional[str] = ..., specs: _Optional[_Iterable[_Union[MeasurementSpec, _Mapping]]] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterDeviceResponse(_message.Message):
    __slots__ = ("device_id", "spec_version", "changed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    spec_version: int
    changed: bool
    def __init__(self, device_id: _Optional[str] = ..., spec_version: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetDeviceStatusRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("device_id", "device_type", "spec_version", "specs", "connected", "reported_status", "reported_reason", "last_acked_sequence", "last_seen_unix_us")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPECS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_STATUS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_type: str
    spec_version: int
    specs: _containers.RepeatedCompositeFieldContainer[MeasurementSpec]
    connected: bool
    reported_status: str
    reported_reason: str
    last_acked_sequence: int
    last_seen_unix_us: int
    def __init__(self, device_id: _Optional[str] = ..., device_type: _Optional[str] = ..., spec_version: _Optional[int] = ..., specs: _Optional[_Iterable[_Union[MeasurementSpec, _Mapping]]] = ..., connected: _Optional[bool] = ..., reported_status: _Optional[str] = ..., reported_reason: _Optional[str] = ..., last_acked_sequence: _Optional[int] = ..., last_seen_unix_us: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("limit", "after", "connected_only")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_ONLY_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after: str
    connected_only: bool
    def __init__(self, limit: _Optional[int] = ..., after: _Optional[str] = ..., connected_only: _Optional[bool] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_after")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    next_after: str
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., next_after: _Optional[str] = ...) -> None: ...

class DeviceMessage(_message.Message):
    __slots__ = ("sequence", "open", "reading", "heartbeat", "command_update", "status")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    READING_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_UPDATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    open: Open
    reading: Reading
    heartbeat: Heartbeat
    command_update: CommandUpdate
    status: StatusReport
    def __init__(self, sequence: _Optional[int] = ..., open: _Optional[_Union[Open, _Mapping]] = ..., reading: _Optional[_Union[Reading, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., command_update: _Optional[_Union[CommandUpdate, _Mapping]] = ..., status: _Optional[_Union[StatusReport, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class Reading(_message.Message):
    __slots__ = ("metric", "value", "unit", "measured_at_unix_us")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    metric: str
    value: float
    unit: str
    measured_at_unix_us: int
    def __init__(self, metric: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., measured_at_unix_us: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at_unix_us",)
    SENT_AT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    sent_at_unix_us: int
    def __init__(self, sent_at_unix_us: _Optional[int] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("status", "reason")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: DeviceState
    reason: str
    def __init__(self, status: _Optional[_Union[DeviceState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CommandUpdate(_message.Message):
    __slots__ = ("command_id", "state", "result_json", "error", "progress")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    state: CommandState
    result_json: str
    error: str
    progress: float
    def __init__(self, command_id: _Optional[str] = ..., state: _Optional[_Union[CommandState, str]] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ..., progress: _Optional[float] = ...) -> None: ...

class GatewayMessage(_message.Message):
    __slots__ = ("ack", "command")
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    command: Command
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequences: _Optional[_Iterable[int]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "command_type", "payload_json", "expires_at_unix_us", "idempotency_key", "issued_by")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BY_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    command_type: str
    payload_json: str
    expires_at_unix_us: int
    idempotency_key: str
    issued_by: str
    def __init__(self, command_id: _Optional[str] = ..., command_type: _Optional[str] = ..., payload_json: _Optional[str] = ..., expires_at_unix_us: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., issued_by: _Optional[str] = ...) -> None: ...

class SendCommandRequest(_message.Message):
    __slots__ = ("device_id", "command_type", "payload_json", "timeout_s", "idempotency_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    command_type: str
    payload_json: str
    timeout_s: float
    idempotency_key: str
    def __init__(self, device_id: _Optional[str] = ..., command_type: _Optional[str] = ..., payload_json: _Optional[str] = ..., timeout_s: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SendCommandResponse(_message.Message):
    __slots__ = ("command_id", "expires_at_unix_us")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    expires_at_unix_us: int
    def __init__(self, command_id: _Optional[str] = ..., expires_at_unix_us: _Optional[int] = ...) -> None: ...

class GetMeasurementsRequest(_message.Message):
    __slots__ = ("device_id", "metric", "from_unix_us", "to_unix_us", "limit")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    FROM_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    TO_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    metric: str
    from_unix_us: int
    to_unix_us: int
    limit: int
    def __init__(self, device_id: _Optional[str] = ..., metric: _Optional[str] = ..., from_unix_us: _Optional[int] = ..., to_unix_us: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("measurement_id", "metric", "value", "unit", "measured_at_unix_us")
    MEASUREMENT_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    measurement_id: str
    metric: str
    value: float
    unit: str
    measured_at_unix_us: int
    def __init__(self, measurement_id: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., measured_at_unix_us: _Optional[int] = ...) -> None: ...

class GetMeasurementsResponse(_message.Message):
    __slots__ = ("measurements",)
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    measurements: _containers.RepeatedCompositeFieldContainer[Measurement]
    def __init__(self, measurements: _Optional[_Iterable[_Union[Measurement, _Mapping]]] = ...) -> None: ...
