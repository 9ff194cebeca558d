"""Sans-IO SCRAM-SHA-256 server side (RFC 5802, RFC 7677), as PostgreSQL speaks it, for the admin console.

Nothing here does I/O. ``ScramServer`` takes the client's SASL messages as bytes and returns
the server's; the shell wraps them in AuthenticationSASLContinue / AuthenticationSASLFinal.

Exchange (PostgreSQL's auth-scram.c flavour)::

    client-first  "n,,n=<ignored>,r=<cnonce>"          gs2 header "n,," or "y,,"; channel
                                                       binding ("p=") is refused: pgguard
                                                       never offers SCRAM-SHA-256-PLUS
    server-first  "r=<cnonce><snonce>,s=<salt>,i=<iterations>"
    client-final  "c=biws,r=<cnonce><snonce>,p=<ClientProof>"
    server-final  "v=<ServerSignature>"

PostgreSQL ignores the SCRAM user name (the startup packet's ``user`` counts), and so do we.
A user who is not allowed, or an allowed user when no password is configured, goes through
the same exchange against a mock verifier derived from a per-process secret, and fails only
at the proof, exactly as a wrong password does: the client learns nothing about which users
exist.

Verifiers are stored as PostgreSQL stores them in ``pg_authid.rolpassword``::

    SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass
from typing import Final

from .errors import AuthenticationFailed, ProtocolViolation

__all__ = [
    "MECHANISM",
    "DEFAULT_ITERATIONS",
    "Verifier",
    "parse_verifier",
    "make_verifier",
    "is_verifier",
    "saslprep",
    "ScramServer",
    "ScramClient",
    "client_proof",
    "is_md5_verifier",
    "md5_response",
]

MECHANISM: Final = "SCRAM-SHA-256"
DEFAULT_ITERATIONS: Final = 4096  # PostgreSQL's scram_iterations default
SALT_LENGTH: Final = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
NONCE_LENGTH: Final = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
_PREFIX: Final = "SCRAM-SHA-256$"
# The secret behind mock verifiers for unknown users (auth-scram.c: mock_auth_nonce).
_MOCK_SECRET: Final = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        b64 = _b64
        return (
            f"{_PREFIX}{self.iterations}:{b64(self.salt)}"
            f"${b64(self.stored_key)}:{b64(self.server_key)}"
        )


def is_verifier(text: str) -> bool:
    """True when ``text`` looks like a stored SCRAM-SHA-256 verifier (not a plain password)."""
    return text.startswith(_PREFIX)


def parse_verifier(text: str) -> Verifier:
    """Parse ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``; raises ValueError when malformed."""
    if not is_verifier(text):
        raise ValueError("does not start with SCRAM-SHA-256$")
    try:
        params, keys = text[len(_PREFIX) :].split("$")
        iter_text, salt_text = params.split(":")
        stored_text, server_text = keys.split(":")
        iterations = int(iter_text)
        salt = base64.b64decode(salt_text, validate=True)
        stored_key = base64.b64decode(stored_text, validate=True)
        server_key = base64.b64decode(server_text, validate=True)
    except ValueError:
        raise ValueError("is not SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>") from None
    if iterations < 1 or not salt or len(stored_key) != 32 or len(server_key) != 32:
        raise ValueError("has a bad iteration count, salt or key length")
    return Verifier(iterations, salt, stored_key, server_key)


def make_verifier(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> Verifier:
    """The verifier PostgreSQL would store for ``password`` (SASLprep applied as it does)."""
    if salt is None:
        salt = secrets.token_bytes(SALT_LENGTH)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    server_key = _hmac(salted, b"Server Key")
    return Verifier(iterations, salt, hashlib.sha256(client_key).digest(), server_key)


def saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep, falling back to the raw bytes when it fails, like pg_saslprep."""
    raw = password.encode("utf-8", "surrogateescape")
    if password.isascii():
        return raw  # PostgreSQL passes pure ASCII through unchanged
    try:
        mapped = "".join(
            " " if stringprep.in_table_c12(ch) else ch
            for ch in password
            if not stringprep.in_table_b1(ch)
        )
        text = unicodedata.normalize("NFKC", mapped)
        prohibited = (
            stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
            stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
            stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
            stringprep.in_table_c9, stringprep.in_table_a1,
        )  # fmt: skip
        if any(check(ch) for ch in text for check in prohibited):
            return raw
        if any(stringprep.in_table_d1(ch) for ch in text):
            if any(stringprep.in_table_d2(ch) for ch in text):
                return raw
            if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
                return raw
        return text.encode("utf-8")
    except UnicodeError:
        return raw


def client_proof(password: str, salt: bytes, iterations: int, auth_message: bytes) -> bytes:
    """The ClientProof a client computes (used by tests and by ``hash-password --check``)."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
    return bytes(a ^ b for a, b in zip(client_key, signature, strict=True))


def mock_verifier(user: str, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """A stable fake verifier for ``user`` that no password matches."""
    salt = _hmac(_MOCK_SECRET, b"salt " + user.encode("utf-8", "surrogateescape"))[:SALT_LENGTH]
    key = _hmac(_MOCK_SECRET, b"key " + user.encode("utf-8", "surrogateescape"))
    return Verifier(iterations, salt, key, key)


class ScramServer:
    """One SCRAM-SHA-256 exchange. ``verifier`` None means: fail at the proof whatever is sent.

    ``mock_iterations`` is the iteration count the mock exchange announces; pass the real
    verifier's, so that the count does not tell real users from others either.
    """

    def __init__(
        self, user: str, verifier: Verifier | None, *, mock_iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        self.user = user
        self._real = verifier is not None
        self._verifier = verifier if verifier is not None else mock_verifier(user, mock_iterations)
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self._nonce = ""
        # Set by a successful ``final``: the client's ClientKey, recovered from its proof
        # (ClientProof XOR HMAC(StoredKey, AuthMessage)); what logs pgguard in to the server
        # as this role without the password (see ScramClient).
        self.client_key: bytes | None = None

    def first(self, client_first: bytes) -> bytes:
        """Take client-first-message; return server-first-message. Raises ProtocolViolation."""
        text = _text(client_first)
        flag, sep, rest = text.partition(",")
        if not sep:
            raise _malformed("client-first-message has no GS2 header")
        if flag.startswith("p="):
            raise ProtocolViolation("channel binding is not supported by the pgguard admin console")
        if flag not in ("n", "y"):
            raise _malformed(f"unexpected channel-binding flag {flag!r}")
        authzid, sep, bare = rest.partition(",")
        if not sep:
            raise _malformed("client-first-message is truncated")
        if authzid:
            raise ProtocolViolation("client uses authorization identity, but it is not supported")
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise ProtocolViolation("client requires an unsupported SCRAM extension")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise _malformed("client-first-message must carry n= and r=")
        client_nonce = attrs[1][2:]
        if not client_nonce or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in client_nonce):
            raise _malformed("bad client nonce")
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(secrets.token_bytes(NONCE_LENGTH))
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first.encode("ascii")

    def final(self, client_final: bytes) -> bytes:
        """Take client-final-message; return server-final-message.

        Raises AuthenticationFailed (28P01) for a wrong proof or an unknown user, and
        ProtocolViolation (08P01) for a malformed message.
        """
        if not self._nonce:
            raise _malformed("client-final-message before client-first-message")
        text = _text(client_final)
        without_proof, sep, proof_attr = text.rpartition(",")
        if not sep or not proof_attr.startswith("p="):
            raise _malformed("client-final-message has no proof")
        attrs = without_proof.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            raise _malformed("client-final-message must start with c= and r=")
        try:
            binding = base64.b64decode(attrs[0][2:], validate=True)
            proof = base64.b64decode(proof_attr[2:], validate=True)
        except ValueError:
            raise _malformed("invalid base64 in client-final-message") from None
        if binding != self._gs2_header.encode("ascii"):
            raise _malformed("unexpected SCRAM channel-binding data")
        if attrs[1][2:] != self._nonce:
            raise _malformed("nonce does not match")
        if len(proof) != 32:
            raise _malformed("malformed proof in client-final-message")
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode("utf-8", "surrogateescape")
        v = self._verifier
        signature = _hmac(v.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if not (ok and self._real):
            raise AuthenticationFailed(self.user)
        self.client_key = client_key
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode("ascii")


class ScramClient:
    """The client side of one SCRAM-SHA-256 exchange, from a ClientKey instead of a password.

    A verified client proof yields the role's ClientKey; the proof for a new exchange with
    the server is ``ClientKey XOR HMAC(H(ClientKey), AuthMessage)``: HMACs only, no PBKDF2
    (the salt and iteration count the server sends are not needed). With the role's
    ServerKey (from its verifier) the server's signature is checked as libpq checks it.
    """

    def __init__(self, client_key: bytes, server_key: bytes | None) -> None:
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = _b64(secrets.token_bytes(NONCE_LENGTH))
        self._client_first_bare = f"n=,r={self._nonce}"
        self._auth_message = b""

    def first(self) -> bytes:
        """client-first-message (no channel binding, empty user name as libpq sends it)."""
        return ("n,," + self._client_first_bare).encode("ascii")

    def final(self, server_first: bytes) -> bytes:
        """client-final-message for ``server_first``; raises ProtocolViolation when malformed."""
        text = _text(server_first)
        attrs = dict(a.split("=", 1) for a in text.split(",") if "=" in a)
        nonce = attrs.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise _malformed("server nonce does not extend the client's")
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        stored_key = hashlib.sha256(self._client_key).digest()
        signature = _hmac(stored_key, self._auth_message)
        proof = bytes(a ^ b for a, b in zip(self._client_key, signature, strict=True))
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify(self, server_final: bytes) -> bool:
        """True when the server's signature is right (always True without a ServerKey)."""
        if self._server_key is None:
            return True
        text = _text(server_final)
        if not text.startswith("v="):
            return False
        try:
            signature = base64.b64decode(text[2:].split(",")[0], validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(signature, _hmac(self._server_key, self._auth_message))


# md5, PostgreSQL's older password method (deprecated, still accepted): pg_authid stores
# "md5" + md5(password || user) in hex; the client answers a 4-byte salt with
# "md5" + md5(hex(md5(password || user)) || salt) in hex. The stored text is enough both to
# check a client's answer and to answer the server: a password-equivalent, kept as such.


def is_md5_verifier(text: str) -> bool:
    """True for a stored md5 password: ``md5`` and 32 lower-case hex digits."""
    return len(text) == 35 and text.startswith("md5") and all(c in "0123456789abcdef" for c in text[3:])


def md5_response(stored: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password(``salt``) for the stored md5 password ``stored``."""
    return "md5" + hashlib.md5(stored[3:].encode("ascii") + salt, usedforsecurity=False).hexdigest()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("SCRAM message is not valid UTF-8") from None


def _malformed(why: str) -> ProtocolViolation:
    return ProtocolViolation(f"malformed SCRAM message ({why})")
