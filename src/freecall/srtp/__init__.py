"""freecall.srtp"""
