"""The DICOM listener's intake side: a Storage SCP that writes what it receives into the inbox.

A received object becomes a file in `inbox/dicom/<calling AE title>/<SOP instance UID>.dcm`,
written under a hidden name, fsynced, renamed in and the folder fsynced; only then is the
success status sent. From there the watcher takes it like any dropped file (complete, by
content hash, never twice): a sender that retries an object we stored sends the same bytes,
which the intake records as a duplicate. Anything that fails before the file is durable answers
a failure status, and the sender keeps the object and retries.

Only the AE titles (and addresses) of MELANOSCREEN_DICOM_PEERS may associate: the DICOM
equivalent of a login. Others are rejected at association (calling AE title not recognised).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import os
import queue
import re
import secrets
import select
import socket
import struct
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from melanoscreen.settings import DicomSettings
from service.dicom import pseudonymise_dataset

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)

#: The largest PDU a sender may send (its length field; what we announce as our maximum).
MAX_PDU_BYTES = 1 << 20
#: The folder of the inbox that received objects go to (one subfolder per calling AE title).
INBOX_FOLDER = "dicom"
#: C-STORE statuses (PS3.4 B.2.3): success; out of resources (the sender retries later);
#: cannot understand; refused: out of resources for good (an object over the size limit).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
OUT_OF_RESOURCES_REFUSED = 0xA701
#: The calling AE title of `melanoscreen healthcheck dicom`: refused like any caller not listed,
#: but (from loopback) logged quietly, so a probe every few seconds does not fill the log.
HEALTH_PROBE_AE_TITLE = "HEALTHCHECK"
_UID = re.compile(r"[0-9.]{1,64}")
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def storage_classes() -> list[str]:
    """The SOP classes the listener stores: the image classes a dermoscopic or clinical
    photograph travels as."""
    from pydicom import uid

    return [uid.VLPhotographicImageStorage, uid.VLMicroscopicImageStorage,
            uid.SecondaryCaptureImageStorage]


def transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, and every compressed one an installed pydicom decoder reads."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    offered: list[str] = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
               uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian]
    for syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless,
                   uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
                   uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless):
        with contextlib.suppress(Exception):
            if get_decoder(syntax).is_available:
                offered.append(syntax)
    return offered


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The File Meta Information group (PS3.10 7.1) of a received object, encoded as pydicom
    encodes pynetdicom's `Event.file_meta` (explicit VR little endian; the same bytes, tested),
    without building a dataset: that took a third of the listener's time per object."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _uid_value(sop_class)),
        _element(0x0003, b"UI", _uid_value(sop_instance)),
        _element(0x0010, b"UI", _uid_value(transfer_syntax)),
        _element(0x0012, b"UI", _uid_value(str(PYNETDICOM_IMPLEMENTATION_UID))),
        _element(0x0013, b"SH", _text_value(PYNETDICOM_IMPLEMENTATION_VERSION)),
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian."""
    if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"a {vr.decode()} value of {len(value)} bytes")
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _text_value(text: str) -> bytes:
    data = text.encode("ascii")
    return data + b" " if len(data) % 2 else data


#: C-STORE-RSP's command field, and the command data set type of a message without a data set.
_C_STORE_RSP, _NO_DATA_SET = 0x8001, 0x0101


def store_response_command(sop_class: str | None, message_id: int, status: int,
                           sop_instance: str | None) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2) without optional elements, encoded implicit VR
    little endian as pynetdicom encodes it through pydicom (the same bytes, tested), without
    building a dataset: that took about a third of the listener's time per object."""
    elements = [(0x0002, _uid_value(sop_class)) if sop_class else None,
                (0x0100, struct.pack("<H", _C_STORE_RSP)),
                (0x0120, struct.pack("<H", message_id)),
                (0x0800, struct.pack("<H", _NO_DATA_SET)),
                (0x0900, struct.pack("<H", status)),
                (0x1000, _uid_value(sop_instance)) if sop_instance else None]
    body = b"".join(struct.pack("<HHI", 0x0000, element, len(value)) + value
                    for element, value in filter(None, elements))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


class QuickStoreResponses(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with a C-STORE response that carries a status alone (what
    the listener's C-STORE handler answers) encoded by `store_response_command`; anything else,
    or a response someone listens for (EVT_DIMSE_SENT), goes pynetdicom's way."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = None
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and isinstance(primitive.Status, int) and primitive.ErrorComment is None
                and primitive.OffendingElement is None
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            with contextlib.suppress(UnicodeEncodeError, struct.error):  # pynetdicom's way
                command = store_response_command(
                    primitive.AffectedSOPClassUID, primitive.MessageIDBeingRespondedTo,
                    primitive.Status, primitive.AffectedSOPInstanceUID)
        largest = self.maximum_pdu_size
        if command is None or (largest and len(command) > largest - 6):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        # One PDV: its control header says a command, and its last fragment.
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


def folder_name(ae_title: str) -> str:
    """A calling AE title as a folder name: letters, digits, `-` and `_` (others become `_`)."""
    return _SAFE.sub("_", ae_title.strip()) or "_"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def request_association(ae: Any, host: str, port: int, **kwargs: Any) -> tuple[Any, bool]:
    """`ae.associate(host, port, **kwargs)`, and whether the peer refused the association.

    pynetdicom can report a refusal as a connection that failed (neither established nor
    rejected): the refusal arrives and closes the connection before the requesting thread
    looks at the connection, and that thread then takes the closed connection for a failed
    one. The A-ASSOCIATE-RJ PDU was received all the same, so it is looked for here."""
    from pynetdicom import evt
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    refusals: list[Any] = []

    def received(event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            refusals.append(event.pdu)

    handlers = [*kwargs.pop("evt_handlers", []), (evt.EVT_PDU_RECV, received)]
    assoc = ae.associate(host, port, evt_handlers=handlers, **kwargs)
    return assoc, bool(assoc.is_rejected or (refusals and not assoc.is_established))


def probe(host: str, port: int, called: str, *, timeout: float) -> bool:
    """Whether a DICOM listener answers an association request at host:port (accepted or
    refused: either is an answer); nothing is sent beyond the request."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=HEALTH_PROBE_AE_TITLE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc, refused = request_association(ae, host, port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return True
    return refused


#: TCP_QUICKACK where the system has it (Linux).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
#: Longest wait (seconds) of a connection's two threads before they look again at what they
#: check between messages (a release, an abort, the idle timeout, a stop); a message that
#: arrives, or one queued to be sent, wakes them at once.
QUIET_WAIT = 0.05


class _WakePipe:
    """A pipe that wakes a connection's thread from its wait on the socket (`GuardedSocket.ready`)
    when something is queued to be sent. Closed once nothing waits on it any more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read: int | None
        self.write: int | None
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        with self.lock:  # never a write to a closed (and perhaps reused) descriptor
            if self.write is not None:
                with contextlib.suppress(BlockingIOError):  # full: it wakes anyway
                    os.write(self.write, b"\0")

    def drain(self) -> None:
        if self.read is not None:
            with contextlib.suppress(BlockingIOError):
                os.read(self.read, 4096)

    def close(self) -> None:
        with self.lock:
            for fd in (self.read, self.write):
                if fd is not None:
                    os.close(fd)
            self.read = self.write = None


class GuardedSocket(AssociationSocket):
    """pynetdicom's connection with three changes. A PDU longer than `max_pdu_bytes` is never
    read: the connection is closed instead (pynetdicom reads a PDU of any length into memory,
    an association request from anyone included). Each read is acknowledged at once
    (TCP_QUICKACK). And, once `quieten`ed, its thread waits on the socket for what arrives
    (and on a pipe for what is to be sent) instead of looking every millisecond."""

    max_pdu_bytes = MAX_PDU_BYTES
    _wake: _WakePipe | None = None

    def quieten(self, dul: DULServiceProvider) -> None:
        """Let the connection's thread (pynetdicom's DUL reactor) wait in `ready` instead of
        sleeping a millisecond between looks: whatever is queued to be sent wakes it."""
        if self._wake is not None:
            return
        wake = self._wake = _WakePipe()
        weakref.finalize(self, wake.close)  # if the association ends without `unquieten`
        send_pdu = dul.send_pdu

        def send_and_wake(primitive: Any) -> None:
            send_pdu(primitive)
            wake.wake()

        dul.send_pdu = send_and_wake  # type: ignore[method-assign]
        dul._run_loop_delay = 0  # the wait is in `ready`

    def unquieten(self) -> None:
        """Close the wake-up pipe (once the connection's thread has ended)."""
        if self._wake is not None:
            self._wake.close()

    @property
    def ready(self) -> bool:
        """Whether data waits to be read; a quiet connection first waits up to QUIET_WAIT for
        data or a wake-up, when its thread has nothing else to do."""
        wake = self._wake
        if wake is not None and wake.read is not None and self.socket is not None \
                and self._is_connected:
            dul = self.assoc.dul
            if dul.event_queue.empty() and dul.to_provider_queue.empty() \
                    and not dul._kill_thread:
                try:
                    readable, _, _ = select.select([self.socket.fileno(), wake.read], [], [],
                                                   QUIET_WAIT)
                except (OSError, ValueError):  # closing meanwhile: pynetdicom's check says so
                    readable = []
                if wake.read in readable:
                    wake.drain()
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_bytes:
            logger.warning("closed a DICOM connection from %s: a PDU of %d bytes, over the %d "
                           "this listener takes", _peer(self.socket), nr_bytes,
                           self.max_pdu_bytes)
            if self.socket is not None:
                with contextlib.suppress(OSError):
                    self.socket.shutdown(socket.SHUT_RDWR)
            return bytearray()  # to pynetdicom, a PDU cut short: the connection is closed
        data: bytearray = super().recv(nr_bytes)
        if _QUICKACK is not None and self.socket is not None:
            with contextlib.suppress(OSError):  # the connection may be closing
                self.socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


class QuietAssociation(Association):
    """pynetdicom's acceptor association, whose thread waits for the next request (up to
    QUIET_WAIT between looks at a release, an abort, the idle timeout) instead of sleeping a
    millisecond between looks: pynetdicom 3.0's loop, with that wait in place of the sleep.
    With its quiet connection (`GuardedSocket.quieten`), an open association costs next to no
    CPU, and an object is answered as soon as it is stored: 6% of a core for an idle
    association before, and half the time per object with DCMTK's storescu."""

    def _run_reactor(self) -> None:
        try:
            self._serve_until_ended()
        finally:
            holder = self.dul.socket
            self.dul.join(timeout=1 + 2 * QUIET_WAIT)
            if isinstance(holder, GuardedSocket) and not self.dul.is_alive():
                holder.unquieten()

    def _serve_until_ended(self) -> None:
        self._is_paused = False
        while not self._kill:
            # pynetdicom pauses this loop while its own send_* methods run in this thread.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, message = self.dimse.msg_queue.get(timeout=QUIET_WAIT)
            except queue.Empty:
                context_id, message = None, None
            if message:
                self._serve_request(message, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for the abort
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.warning("DICOM association from %s ended: nothing received for %s s",
                               str(self.requestor.ae_title).strip() or "a caller",
                               self.network_timeout)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _peer(connection: socket.socket | None) -> str:
    try:
        return str(connection.getpeername()[0])  # type: ignore[union-attr]
    except (AttributeError, OSError, IndexError):
        return "an unknown address"


def _exists(name: str, directory: int) -> bool:
    """Whether `name` (a link included) is in the open folder `directory`."""
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class Listener:
    """The Storage SCP: who may call, and where what they send is written."""

    def __init__(self, dicom: DicomSettings, inbox: Path, key: Callable[[], bytes], *,
                 max_bytes: int) -> None:
        self.dicom = dicom
        self.inbox = inbox
        #: MELANOSCREEN_MAX_FILE_BYTES: a larger object would be left in the inbox unread, so it
        #: is refused here instead, and the sender told.
        self.max_bytes = max_bytes
        self.key = key  # the pseudonyms' key, read when first needed
        self._naming = threading.Lock()  # one rename at a time picks a free name
        #: Bytes of P-DATA each association has sent since its last object was answered.
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._counting = threading.Lock()
        self.server: ThreadedAssociationServer | None = None

    def application_entity(self) -> AE:
        """A pynetdicom AE with the storage contexts and Verification."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.dicom.ae_title)
        ae.require_called_aet = True  # a call to another AE title was not meant for us
        syntaxes = transfer_syntaxes()
        for sop_class in storage_classes():
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        # Senders split an object into PDUs of at most this size (a larger one closes the
        # connection: GuardedSocket); 1 MiB keeps the count of PDUs per image small.
        ae.maximum_pdu_size = MAX_PDU_BYTES
        return ae

    def start(self) -> ThreadedAssociationServer:
        """Listen (in threads) on the configured address and port."""
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, self.on_connection),
                               (evt.EVT_DATA_RECV, self.on_data),
                               (evt.EVT_REQUESTED, self.on_requested),
                               (evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store)]
        assert self.dicom.port is not None
        server = self.application_entity().start_server(
            (self.dicom.address, self.dicom.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False: the server, running in its threads
        self.server = server
        return server

    def stop(self) -> None:
        """Stop listening; associations in progress are ended."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def on_connection(self, event: Event) -> None:
        """Answers go out at once (TCP_NODELAY); what arrives is acknowledged at once, and no
        PDU over MAX_PDU_BYTES is read (GuardedSocket).

        A sender that leaves Nagle's algorithm on (DCMTK's storescu unless TCP_NODELAY=1 is in
        its environment, and modalities built on it) writes each PDU's header and its body
        separately, and holds the body back until the header is acknowledged; Linux delays
        that acknowledgement by up to 40 ms, so each object would wait about 90 ms.
        Acknowledging every read at once (TCP_QUICKACK) takes that wait away: DCMTK's storescu
        went from 48 ms an object to 4 ms here.
        """
        holder = getattr(event.assoc.dul, "socket", None)
        connection = getattr(holder, "socket", None)
        if holder is None or not isinstance(connection, socket.socket):
            return
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if type(holder) is AssociationSocket:
            holder.__class__ = GuardedSocket  # the same object, reading through the guard
        if type(event.assoc) is Association and isinstance(holder, GuardedSocket):
            event.assoc.__class__ = QuietAssociation  # the same association, waiting quietly
            holder.quieten(event.assoc.dul)
        if type(event.assoc.dimse) is DIMSEServiceProvider:
            event.assoc.dimse.__class__ = QuickStoreResponses  # the same provider, answering quicker

    def on_data(self, event: Event) -> None:
        """Count what a sender has sent since its last object was answered; past
        MELANOSCREEN_MAX_FILE_BYTES (and a PDU), abort the association: pynetdicom keeps an
        object in memory until its last byte, so a larger one is stopped while it arrives, not
        refused once whole."""
        data = event.data
        if not data or data[0] != 0x04:  # P-DATA-TF only: the association's own PDUs are small
            return
        with self._counting:
            received = self._received.get(event.assoc, 0) + len(data)
            self._received[event.assoc] = received
        if received > self.max_bytes + MAX_PDU_BYTES and not event.assoc.is_aborted:
            caller = str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()
            logger.warning("DICOM association from %s aborted: an object of more than %d "
                           "bytes, over MELANOSCREEN_MAX_FILE_BYTES (%d)", caller or "a caller",
                           received, self.max_bytes)
            event.assoc.abort()  # in a handler: queued, sent by the connection's own thread

    def on_requested(self, event: Event) -> None:
        """Reject an association from a caller not in MELANOSCREEN_DICOM_PEERS (permanent,
        calling AE title not recognised)."""
        requestor = event.assoc.requestor
        # At this event only the request itself names the caller (pynetdicom copies the title
        # onto `requestor` later, while negotiating).
        request = requestor.primitive
        title = str(request.calling_ae_title if request is not None else "").strip()
        address = str(requestor.address)
        if self.dicom.allows(title, address):
            return
        probing = title == HEALTH_PROBE_AE_TITLE and _is_loopback(address)
        logger.log(logging.DEBUG if probing else logging.WARNING,
                   "refused a DICOM association from AE title %r at %s: not in "
                   "MELANOSCREEN_DICOM_PEERS", title, address)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.is_rejected = True
        event.assoc.kill()

    def on_echo(self, event: Event) -> int:
        """C-ECHO: we are here."""
        return SUCCESS

    def on_store(self, event: Event) -> int:
        """C-STORE: write the object durably into the inbox, then answer success."""
        with self._counting:
            self._received.pop(event.assoc, None)  # a whole object: the next one counts anew
        caller = str(event.assoc.requestor.ae_title).strip()
        request = cast(C_STORE, event.request)
        uid = str(request.AffectedSOPInstanceUID or "")
        try:
            data = self.encoded(event)
        except Exception as exc:
            logger.warning("DICOM object from %s not stored: cannot be read (%s)", caller,
                           type(exc).__name__)
            return CANNOT_UNDERSTAND
        if len(data) > self.max_bytes:
            logger.warning("DICOM object from %s refused: %d bytes is over "
                           "MELANOSCREEN_MAX_FILE_BYTES (%d)", caller, len(data), self.max_bytes)
            return OUT_OF_RESOURCES_REFUSED
        try:
            path = self.write(caller, uid, data)
        except OSError as exc:
            logger.error("DICOM object from %s not stored (the sender will retry): %s", caller,
                         exc.strerror or exc)
            return OUT_OF_RESOURCES
        logger.info("DICOM object from %s stored as %s", caller, path.relative_to(self.inbox))
        return SUCCESS

    def encoded(self, event: Event) -> bytes:
        """The object as a DICOM file: preamble, file meta and the dataset as it was sent (or,
        pseudonymised, re-encoded without the patient's identifiers)."""
        request = cast(C_STORE, event.request)
        if not self.dicom.pseudonymise:
            dataset_bytes = request.DataSet
            assert dataset_bytes is not None  # a C-STORE request always carries its dataset
            meta = file_meta(str(request.AffectedSOPClassUID or ""),
                             str(request.AffectedSOPInstanceUID or ""),
                             str(event.context.transfer_syntax))
            return b"".join((b"\x00" * 128, b"DICM", meta, dataset_bytes.getvalue()))
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        pseudonymise_dataset(dataset, self.key())
        out = io.BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def write(self, caller: str, uid: str, data: bytes) -> Path:
        """`data` as inbox/dicom/<caller>/<uid>.dcm (or `<uid>-1.dcm`...: nothing is replaced),
        durable (file and folder fsynced) before this returns.

        Every step goes through the folders' own descriptors, opened without following links:
        a link that another user of a shared inbox plants, or swaps in meanwhile, is never
        written through.
        """
        folder = self.inbox / INBOX_FOLDER / folder_name(caller)
        directory = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in (INBOX_FOLDER, folder_name(caller)):
                try:
                    os.mkdir(name, 0o700, dir_fd=directory)
                    os.fsync(directory)  # the new folder's name is durable too
                except FileExistsError:
                    pass
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, dir_fd=directory)
                except OSError as exc:
                    raise OSError(f"{folder} is not a folder of its own (a link?)") from exc
                os.close(directory)
                directory = child
            return folder / self._write_in(directory, uid, data)
        finally:
            os.close(directory)

    def _write_in(self, directory: int, uid: str, data: bytes) -> str:
        """Write `data` durably into the open folder `directory`; the name it got."""
        stem = uid if _UID.fullmatch(uid) else "object"
        # Hidden while written: the watcher ignores names that start with a dot.
        partial = f".{stem}.{secrets.token_hex(8)}.part"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=directory)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(partial, dir_fd=directory)
            raise
        os.close(fd)
        try:
            with self._naming:
                target, counter = f"{stem}.dcm", 0
                while _exists(target, directory):
                    counter += 1
                    target = f"{stem}-{counter}.dcm"
                os.rename(partial, target, src_dir_fd=directory, dst_dir_fd=directory)
            os.fsync(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=directory)
            raise
        return target

