"""Named errors of the tracer API, so callers (and the handler) can tell bad input from bugs."""


def last_line(exc: BaseException) -> str:
    """`Type: last line of the message`: TorchScript and rank errors carry long tracebacks."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1]}" if text else type(exc).__name__


class TpServeError(Exception):
    """Base class of every error tpserve raises on purpose."""


class TraceError(TpServeError):
    """Tracing could not run or failed on a rank."""


class CompilerArgsError(TpServeError, ValueError):
    """compiler_args holds an argument the backend does not know."""


class CheckpointKeyError(TpServeError, KeyError):
    """The checkpoint's keys do not match the model's (missing or unexpected keys)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CheckpointFormatError(TpServeError, ValueError):
    """A checkpoint file is not what its name says (e.g. a damaged .safetensors)."""


class CheckpointShapeError(TpServeError, ValueError):
    """A checkpoint tensor does not have the unsharded shape the layer expects."""


class ArtifactError(TpServeError):
    """A saved model directory cannot be loaded safely."""


class ManifestError(ArtifactError):
    """manifest.json is missing or unreadable."""


class MissingRankError(ArtifactError):
    """A tp_{rank} directory named by the manifest is missing."""


class TpDegreeMismatchError(ArtifactError):
    """The saved tp_degree does not match the rank directories or the caller's expectation."""


class ChecksumMismatchError(ArtifactError):
    """A file's sha256 differs from the one recorded in the manifest."""


class TorchVersionMismatchError(ArtifactError):
    """The artifacts were traced with another torch version."""


class TpServeVersionMismatchError(ArtifactError):
    """The artifacts were built by another tpserve version (whose handler and runtime may differ)."""


class InputSignatureError(TpServeError, ValueError):
    """Call inputs do not match the traced input signature (count, dtype, rank)."""


class BucketSelectionError(TpServeError, ValueError):
    """No bucket fits the input (e.g. a sequence longer than the largest bucket)."""


class RankExecutionError(TpServeError, RuntimeError):
    """A rank failed while running a request; the other ranks were released."""


class RankDiedError(RankExecutionError):
    """A rank process exited; the model cannot serve until it is loaded again."""


class RankTimeoutError(RankExecutionError):
    """A rank did not answer within the collective timeout (hung or deadlocked)."""


class RankNotLocalError(TpServeError, LookupError):
    """A rank's graphs were asked for, but that rank runs in another process."""


class ModelClosedError(TpServeError, RuntimeError):
    """The TensorParallelModel was closed."""


class TextTooLongError(TpServeError, ValueError):
    """A text has more tokens than the model reads, and the embedder was told to reject, not truncate."""


class TokenIdError(TpServeError, ValueError):
    """A token id a client sent is outside the model's vocabulary."""


class PromptNameError(TpServeError, ValueError):
    """A request named a prompt the model's sentence-transformers config does not have."""


class GenerationRequestError(TpServeError, ValueError):
    """A generation request the model cannot run (bad sampling values, prompt too long, ...);
    status is the HTTP status a server should answer (400, or 413 for a prompt over the limit)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UsageError(TpServeError, ValueError):
    """A misuse of the offline tracer found before any work starts (the CLI exits 2)."""
