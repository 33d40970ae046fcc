# KunServe-mesh: one image for every service (gateway, router, planner, worker); the command
# picks the service (see docker-compose.yml). CPU build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1

# g++ (+ ninja below): the worker compiles its fused CPU decode-attention kernel on first use;
# without a compiler it falls back to the slower gather + SDPA path
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, pinned, from the CPU index: a bare `torch` from PyPI pulls the CUDA wheels
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
# the dependencies before the source, so a code change does not reinstall them
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt ninja \
    && rm /tmp/requirements.txt

COPY shared/ shared/
COPY gateway/ gateway/
COPY router/ router/
COPY planner-svc/ planner-svc/
COPY gpu-worker/ gpu-worker/
RUN pip install --no-deps . && rm -rf /src/build

# not root; /models belongs to the service user so a fresh named volume mounted there does too
RUN useradd --create-home --uid 10001 kunserve \
    && mkdir -p /models && chown kunserve /models
USER kunserve
WORKDIR /home/kunserve
CMD ["kunserve", "--help"]
