# The fedbus image: one image for every role (coordinator, aggregator, worker);
# the Kubernetes manifests in deploy/k8s pass the role as the first argument.
#   docker build -t fedbus:0.1.0 .
#   docker run --rm fedbus:0.1.0 --help
# torch is the CPU build, pinned like pyproject.toml (torch==2.13.0): the PyTorch
# CPU index is searched first, so no CUDA wheels are pulled.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/fedbus
WORKDIR /src
# The CPU wheel first, from the CPU index only: `pip install .` below then finds
# torch==2.13.0 satisfied and never resolves it against PyPI's CUDA build.
RUN /opt/fedbus/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY fedbus ./fedbus
RUN /opt/fedbus/bin/pip install . \
    && /opt/fedbus/bin/python -c "import torch; assert not torch.cuda.is_available() and torch.version.cuda is None, torch.__version__"

FROM python:3.11-slim
ENV PATH=/opt/fedbus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/fedbus /opt/fedbus
# A fixed non-root uid/gid: the manifests' runAsUser/fsGroup use the same numbers.
RUN groupadd --system --gid 10001 fedbus \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/fedbus --create-home \
       --shell /usr/sbin/nologin fedbus
USER 10001:10001
WORKDIR /home/fedbus
ENTRYPOINT ["fedbus"]
CMD ["--help"]
