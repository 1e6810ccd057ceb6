# The dvp worker and CLI. Build: docker build -t dvp .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY adapters adapters
COPY activities activities
COPY workflows workflows
COPY starter starter
COPY worker.py ./
RUN pip install --no-cache-dir .
ENTRYPOINT ["dvp"]
CMD ["worker"]
