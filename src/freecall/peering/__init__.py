"""freecall.peering"""
