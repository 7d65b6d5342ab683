"""steerprune.steering"""
__all__: list[str] = []
