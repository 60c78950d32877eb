.PHONY: setup dashboard test
setup:
	bash scripts/setup.sh
dashboard:
	bash scripts/dashboard.sh
test:
	bash scripts/test.sh
