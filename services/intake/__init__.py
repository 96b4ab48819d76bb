"""intake: grid workers, the 12345 hotline and sensors report incidents; anyone follows an incident's status."""
