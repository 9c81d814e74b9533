"""End-to-end tests against real ``twistd -n imgproxy`` processes, and the packaging test."""
