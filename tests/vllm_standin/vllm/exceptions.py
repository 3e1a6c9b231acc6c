"""Stand-in for ``vllm.exceptions``: the error a request's invalid parameters raise."""


class VLLMError(Exception):
    pass


class VLLMValidationError(VLLMError):
    pass
