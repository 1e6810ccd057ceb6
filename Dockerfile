# The dvp worker and CLI. Build: docker build -t dvp .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY adapters adapters
COPY stores stores
COPY activities activities
COPY workflows workflows
COPY connection connection
COPY processes processes
COPY starter starter
COPY bank bank
COPY bench bench
COPY demos demos
COPY worker.py ./
RUN pip install --no-cache-dir .
ENTRYPOINT ["dvp"]
CMD ["worker"]
