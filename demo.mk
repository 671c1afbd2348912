# The demo chain (`make all`); each step is a file target, so a second `make all` only prints the report.
all: install
	@echo "demo: not wired yet"
clean-demo:
	rm -rf runs/demo
