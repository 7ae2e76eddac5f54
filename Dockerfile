# One multi-stage image; each service picks its extra:  docker build --build-arg EXTRA=serving --target runtime .
# syntax=docker/dockerfile:1.7
FROM python:3.11.11-slim-bookworm AS build
ARG EXTRA=all
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broadfast ./broadfast
COPY streams ./streams
COPY training ./training
COPY serving ./serving
COPY features ./features
COPY monitoring ./monitoring
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[${EXTRA}]"

FROM python:3.11.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 BROADFAST_HOME=/var/lib/broadfast
RUN useradd --system --uid 10001 --home /var/lib/broadfast broadfast && mkdir -p /var/lib/broadfast && chown broadfast /var/lib/broadfast
COPY --from=build /opt/venv /opt/venv
USER broadfast
WORKDIR /var/lib/broadfast
ENTRYPOINT []
CMD ["broadfast", "--help"]
