"""freecall.sdp"""
