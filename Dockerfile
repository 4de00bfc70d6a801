# One image for the coordinator, the demo participants and the demo itself
# (docker-compose.yml runs each with its own command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that editing the code does not reinstall them.
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY coordinator ./coordinator
RUN pip install ".[otel]"

# The demo shop is an example, not part of the installed package: it runs from here
# (`python -m examples.shop SERVICE`, `python -m examples.shop demo`).
COPY examples ./examples
ENV PYTHONPATH=/app

RUN useradd --system --no-create-home sagaplane
USER sagaplane

# The coordinator by default; its health check (`sagaplane health`) is in
# docker-compose.yml, since the participants run from this image too.
EXPOSE 50051
# Plaintext (--insecure) so that the image runs as it is in a private network; mount a
# certificate and add --tls-cert/--tls-key (and --auth-tokens) anywhere else.
CMD ["sagaplane", "serve", "--listen", "0.0.0.0:50051", "--insecure"]
